//! Kafka source tests (placeholder until written).
