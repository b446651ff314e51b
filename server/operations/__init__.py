"""Operations: metrics, logs and the health probe."""
