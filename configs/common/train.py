"""Training loop settings shared by every config (detectron2 LazyConfig style)."""
train = dict(
    output_dir="./output",
    init_checkpoint="",       # weights to start from (or to evaluate with --eval-only)
    trust_checkpoint=False,   # allow checkpoints that need full unpickling (runs code from the file)
    max_iter=90000,
    amp=dict(enabled=False),  # mixed precision (fp16 autocast, dynamic loss scale); CUDA only
    sync_bn=False,            # BatchNorm -> SyncBatchNorm across CUDA processes
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=3),
    checkpoint_history=True,  # temporal history in checkpoints: --resume continues bit for bit
    eval_period=5000,         # 0: evaluate after the last iteration only; None: never
    log_period=20,
    device="cuda",
    seed=0,
    clip_grad=dict(enabled=True, max_norm=5.0, norm_type=2.0),
    cudnn_benchmark=False,
    num_threads=None,         # CPU threads per process for PyTorch's ops (None: PyTorch's / the launcher's share)
    deterministic=False,      # torch.use_deterministic_algorithms: a run repeats its numbers exactly
    extra_hooks=[],           # project hooks: [LazyCall(SomeHook)(...), ...]
)
