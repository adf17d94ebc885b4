"""Videos to a store: the options (`config`), the frozen encoders (`encoders`), decode worker processes
(`workers`), the loop that feeds the encoders and publishes whole shards (`pipeline`), the device-to-host
copies and the writer thread (`writeback`), and the torchrun rank group (`ranks`).

This file imports nothing: a decode worker imports `workers` without torch."""
