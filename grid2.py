C = "/work/runs-seg/cfgs/"
DEMO = "/work/runs-seg/code2/configs/segmentation/demo_fcn_r18_d8_scenes.py"
CW = "model.decode_head.loss_decode.class_weight=[0.2,1,1,1,1,1,1,1,1,1,1]"
CW1 = "model.decode_head.loss_decode.class_weight=[0.1,1,1,1,1,1,1,1,1,1,1]"
LR = "optim_wrapper.optimizer.lr=0.05"
GRID = [
    ("os16_160_cw", "moco", C + "os16.py", ["train_cfg.max_iters=160", LR, CW]),
    ("d8_160_cw", "moco", DEMO, ["train_cfg.max_iters=160", LR, CW]),
    ("os16_160_cw_lr10", "moco", C + "os16.py", ["train_cfg.max_iters=160", "optim_wrapper.optimizer.lr=0.1", CW]),
    ("os16c96_160_cw", "moco", C + "os16_crop96.py", ["train_cfg.max_iters=160", LR, CW]),
    ("os16_160_cw01", "moco", C + "os16.py", ["train_cfg.max_iters=160", LR, CW1]),
    ("os16_160_cw", "sup", C + "os16.py", ["train_cfg.max_iters=160", LR, CW]),
    ("os16_160_cw", "random", C + "os16.py", ["train_cfg.max_iters=160", LR, CW]),
]
