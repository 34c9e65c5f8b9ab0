"""build_loader (build) and its torch, gpu and DALI implementations over one plan reader."""
