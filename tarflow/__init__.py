"""tarflow: TarFlow normalizing flows with fast GS-Jacobi sampling.

Ring 1 (``tarflow.model``, ``tarflow.sampling``, ``tarflow.data``, ``tarflow.eval``) is pure torch;
``tarflow.lit`` holds the Lightning glue and ``tarflow.cli`` the Hydra entry points.
"""

__version__ = "0.1.0"
