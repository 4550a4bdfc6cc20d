"""The only modules that read GGUF files or ask NVML / psutil about the machine."""
