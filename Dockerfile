FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN useradd --create-home inferq && mkdir -p /data/artifacts && chown inferq /data/artifacts
USER inferq
ENV STORAGE_ROOT=/data/artifacts FLASK_APP=web.app:create_app
EXPOSE 8000 5555
