"""Side-by-side benchmarks: every figure is a ratio of two things measured in the
same run, because absolute times on shared machines are noise.

    python -m benchmarks [--full] [--only NAME] [--output FILE.json]
    python -m benchmarks.gpu_smoke [--official-source moco/builder.py]   # one GPU, <= 8 min
"""
