"""
Discovery of local model servers: Ollama, LM Studio, vLLM, the llama.cpp
server and any other OpenAI-compatible server, found on the addresses the
operator lists, among this host's listening TCP ports and among the
running containers of the Docker daemon whose socket is mounted.  Each
server found becomes a keyless provider of the registry, with its models.

Off unless the operator turns it on (L{cllama_tx.discovery.settings}).
The pure parts (settings, the OS's socket tables, the servers' and
Docker's answers, naming) are free of I/O; probing
(L{cllama_tx.discovery.probe}), reading the OS
(L{cllama_tx.discovery.host}) and asking Docker
(L{cllama_tx.discovery.docker_client}) are driven by the scheduler
(L{cllama_tx.discovery.service}), which keeps the registry's layer of
discovered providers (L{cllama_tx.discovery.registered}) up to date.
"""
