"""Converters from other datasets' formats (LeRobot, robomimic) into the replay-buffer zarr layout."""
