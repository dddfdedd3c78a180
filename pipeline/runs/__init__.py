"""The run folder and its files: layout, status and records (``runfolder``), the one atomic
write path (``atomic``), complete checkpoints and history (``checkpoints``), what ``resume=``
continues (``resume``), and progress of long work (``progress``)."""
