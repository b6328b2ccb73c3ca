"""Checkpoints: `accelerator.save_state` into `<output_dir>/checkpoints/<step>/`, made visible only
when complete, plus the trainer's own position so a resumed run continues where it stopped. A crash
during a save leaves at most an unpublished `.tmp-*` folder, which `--resume auto` never sees and a
later save removes. The folder must be on a filesystem all ranks share.

    saver.py            when to save, the save and its publication, keep_last/keep_best (CheckpointSaver)
    background_save.py  checkpoint.async_save: the state captured into host memory, written by a thread
    files.py            manifest and checksums, verify, fsync, the ranks' markers, the shared-folder probe
    state.py            what a checkpoint records beside the model: TrainerState, its evaluation, its format
    resume.py           which checkpoint --resume means, how to restore it here, the load (CheckpointResumer)
    universal.py        DeepSpeed's universal form of a ZeRO checkpoint: converted once, loaded repaired
    per_parameter.py    weights and optimizer state by parameter name: resumes across DDP and ZeRO
    export.py           consolidated safetensors from any checkpoint (`shardvision export`, core/commands/export.py)
"""
