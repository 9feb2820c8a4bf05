"""Policy layer: cost model, placement solver, dispatcher, controller and baselines.

Pure Python. Imports neither ray nor torch (a test enforces it), so the simulator and the
Ray Serve runtime drive exactly the same objects.
"""
