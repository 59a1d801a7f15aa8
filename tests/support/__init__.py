"""The test suite's one support package: what more than one test module needs lives here once.

- `infra`: Mosquitto and the OCI registry as child processes on free ports, `free_port`,
  `push_wasm`.
- `nats`: the clustered MQTT broker, three nats-server nodes (`nats_cluster`).
- `postgres`: a PostgreSQL of the tests' own (`initdb` + `postgres` on a free port), a fresh
  database per test.
- `state`: the two durable backends (SQLite, PostgreSQL) the store contract tests run against.
- `waits`: `eventually`, the one bounded poll.
- `processes`: child processes (`ChildProcess`), services as `propeller-fl serve` processes
  (`ServiceProcess`), `propeller-fl up` (`UpProcess`).
- `clients`: gRPC stubs to every service and the calls tests make through them.
- `cluster`: in-process services and real proplets on the test broker (`cluster`,
  `round_services`, `serve_app`, `proplets`); the coordinator as a process beside its
  in-process registry and aggregator (`coordinator_process`, `running`).
- `netns`: hosts of the tests' own (network namespaces on a bridge, a veth pair each), their
  links cut, restored, or delayed and lossy (through `lossy_link`, the kernel having no netem).

Fixtures built from these (`broker`, `registry`, `postgres_server`, `database_url`,
`state_backend`, `topics`, `trainer_wasm`, `trainer_image`) are in
tests/conftest.py, which also tiers the suite (markers) and picks the Hypothesis profile.
"""
