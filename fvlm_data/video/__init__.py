"""Video files to frames: decoding with PyAV and sampling over the whole video (`decode`), exact decoding
planned GOP by GOP (`gops`), what is wrong with a file in one line (`probe`), and a file's segments
decoded in one pass (`segments`). Imports no torch: decode workers start in a fraction of a second."""
