-- The row the health check rewrites (see migrations/0005 for SQLite).
CREATE TABLE heartbeat (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    at TEXT   NOT NULL
);
INSERT INTO heartbeat (id, at) VALUES (1, '');
