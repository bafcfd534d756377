"""The run folder: its files written atomically, refusing mixed runs, and checkpoints."""
