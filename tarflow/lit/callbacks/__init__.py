"""Lightning callbacks for TarFlow (the GS-Jacobi sampling / FID callback lands here).

Order matters: a callback that must see the EMA weights (sampling, FID) is listed before the
``ema`` callback in ``tarflow/conf/callbacks/default.yaml``; see that file.
"""
