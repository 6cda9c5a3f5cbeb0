//! Reaching the real services tests need (RabbitMQ here): present, or loudly absent in CI.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The RabbitMQ of this machine.
pub const RABBITMQ_ADDR: &str = "127.0.0.1:5672";

/// Whether `CI` is set: a test that needs a service then fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `Some(address)` when RabbitMQ accepts connections. When it does not: in CI, a panic naming
/// the problem; elsewhere `None` and a line on stderr saying the test was skipped.
///
/// # Panics
/// In CI, when RabbitMQ cannot be reached.
pub fn rabbitmq(test: &str) -> Option<SocketAddr> {
    let addr = rabbitmq_addr();
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => Some(addr),
        Err(e) if in_ci() => panic!("{test}: RabbitMQ is required in CI and {addr} is unreachable: {e}"),
        Err(e) => {
            eprintln!("SKIPPED {test}: RabbitMQ at {addr} is unreachable ({e}); start it with `rabbitmq-server -detached`");
            None
        }
    }
}

/// Where the tests' RabbitMQ is: `IM_TEST_RABBITMQ_ADDR`, else [`RABBITMQ_ADDR`] (not probed).
///
/// # Panics
/// When `IM_TEST_RABBITMQ_ADDR` is not a socket address.
pub fn rabbitmq_addr() -> SocketAddr {
    std::env::var("IM_TEST_RABBITMQ_ADDR").unwrap_or_else(|_| RABBITMQ_ADDR.into()).parse().expect("a socket address")
}

/// An AMQP URL for `addr` with the default guest account.
pub fn amqp_url(addr: SocketAddr) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}
