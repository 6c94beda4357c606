"""The example trainer's reusable parts (``examples/train_video_rank.py`` is the entry point)."""
