# GPU image for training and sampling. Build: docker build --tag mscd-edm2:latest .
# Run:   docker run --gpus all -it --rm --user $(id -u):$(id -g) -v `pwd`:/workspace mscd-edm2:latest \
#            torchrun --standalone --nproc_per_node=8 train_edm2.py --help
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONDONTWRITEBYTECODE=1
ENV PYTHONUNBUFFERED=1

# The base image ships a CUDA build of torch; install everything else we pin.
COPY requirements.txt /tmp/requirements.txt
RUN grep -v '^torch==' /tmp/requirements.txt > /tmp/requirements-no-torch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt

WORKDIR /workspace
