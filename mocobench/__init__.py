"""What every package of the suite shares: errors, config, distributed helpers,
data sources, file I/O. Nothing here imports pretrain, converters or transfer."""
