"""Model cards and the registry of exported ONNX encoders in the object store."""
