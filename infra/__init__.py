"""Local Apache Kafka (KRaft) broker, topic definitions and deployment settings."""
