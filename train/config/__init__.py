"""What a run is: every setting written once (`settings`) and the paper's presets."""
