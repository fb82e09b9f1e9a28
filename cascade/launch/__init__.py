"""Launching a recipe's job graph: here (`graph`: `cascade run`, `cascade step`) or as SLURM jobs (`slurm`), with
the bookkeeping that stops requeue loops (`requeue`). Imports point one way: slurm -> graph -> requeue."""
