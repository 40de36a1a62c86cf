# NCF on an NVIDIA NGC PyTorch image, as the original: CUDA, cuDNN, NCCL and a CUDA build of
# torch come with it. Another release: --build-arg FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:YY.MM-py3
#   docker build -t ncf .
#   docker run --gpus all --ipc=host -it --rm -v /path/to/data:/data ncf
# prepare_dataset.sh and ncf.py read and write under /data by default: mount it from the host.
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:24.05-py3
FROM ${FROM_IMAGE_NAME}

# prepare_dataset.sh unpacks the MovieLens archives with unzip and downloads them with curl.
RUN apt-get update \
    && apt-get install -y --no-install-recommends unzip curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/recommendation
# Alone first, so editing the code does not re-run pip. requirements.txt asks for a torch
# range that the image's own build (e.g. 2.4.0a0+...nv24.05) satisfies, so pip keeps it.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .

# The same image serves a trained model (README: Serving); serve.py needs nothing more:
#   docker run -it --rm -p 8000:8000 -v /path/to/data:/data ncf python serve.py \
#       --data /data/cache/ml-20m --load_checkpoint_path /data/checkpoints/model.pth --host 0.0.0.0
EXPOSE 8000
