"""The docker backend of the emulation: containers as nodes, the registry-free image,
compose/Swarm files and the self-shaping entry point of compose device services."""
