"""Converters between other projects' dataset formats and our replay-buffer zarr store.

`lerobot`: LeRobotDataset v3.0 (and v2.1) in and v3.0 out; `robomimic`: robomimic HDF5 in; `video`:
the PyAV frame reader/writer they share. Each converter writes through `ReplayBuffer`'s checked
writer, episode by episode.
"""
