//! Integration tests against the real RabbitMQ and PostgreSQL (`AMQP_URL`, `DATABASE_URL`).
//! Each test has its own namespace and database, so they run in parallel.

mod agents;
mod agents_cli;
mod batches;
mod bench;
mod broker;
mod ceiling;
mod cluster;
mod command_line;
mod completion;
mod contract;
mod decomposer;
mod ended;
mod errors;
mod external;
mod fake_model;
mod fallback;
mod helpers;
mod hostile;
mod invariants;
mod list;
mod llm;
mod outage;
mod planning;
mod privilege;
mod quota;
mod races;
mod routing;
mod scheduling;
mod shutdown;
mod stall;
mod tls;
mod tracking;
mod understanding;
mod why;
mod workflows;
