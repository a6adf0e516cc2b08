"""The whole pipeline as production runs it, fed by the simulator."""
