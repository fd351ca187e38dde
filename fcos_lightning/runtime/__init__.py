"""Running a trained network: the Predictor (images in, detections out), network preparation for fast
inference, precision choice, and the ONNX backend."""
