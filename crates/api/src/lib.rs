//! The agent's REST API: request and response types and a unix-socket client
