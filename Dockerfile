# One image for all three services; the Deployment picks the module to run.
# On GPU nodes, pip's default torch wheel is the CUDA build.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
COPY pyproject.toml ./
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir .
USER 65534
CMD ["python", "-m", "services.gateway"]
