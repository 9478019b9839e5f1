"""Launching where users run: Slurm batch scripts, Kubernetes manifests, and
the allocator that places jobs on a cluster's GPUs. Writes files and calls
sbatch; never imports torch.distributed."""
