"""Demo and development tools around the Serve runtime (not part of it): `make demo`
(`demo`), a private local Ray + Serve for tests and benchmarks (`local`), a local multi-node Ray
cluster with fake GPUs (`cluster`), and killing replicas on purpose (`chaos`)."""
