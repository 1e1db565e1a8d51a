"""The composition layer: the run owner that joins the emulation (cells, brokers,
processes) and the relay (orchestrators, agents) into runs with outputs."""
