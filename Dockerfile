# Image for the gopo-online parts that are not vLLM servers (worker, learner, controller) on a GPU host.
# The vLLM servers use the official vllm/vllm-openai image (see docker-compose.yml).
FROM vllm/vllm-openai:latest
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gopo_online ./gopo_online
COPY simulator ./simulator
COPY workers ./workers
COPY trainer ./trainer
COPY configs ./configs
RUN pip install --no-cache-dir -e ".[train]"
ENTRYPOINT ["gopo-online"]
