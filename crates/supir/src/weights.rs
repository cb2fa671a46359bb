//! Checkpoint loading: safetensors (memory-mapped) and PyTorch zip checkpoints, merged the way
//! `SUPIR/util.py::create_SUPIR_model` merges the SDXL base file and the SUPIR file.
