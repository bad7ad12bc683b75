"""Policy serving over websockets (openpi-compatible): protocol.py (msgpack-numpy wire format),
server.py (`dp serve`, torch), client.py (numpy/msgpack/websockets only, safe for robot code).

Nothing is imported here, so `import diffusion_policy.serving.client` never pulls in torch.
"""
