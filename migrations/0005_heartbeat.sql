-- One row that the store's health check rewrites: a ping that changes a page proves the file takes
-- writes (a full disk or a read-only file fails it), where an empty transaction writes nothing.
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at TEXT NOT NULL
);
INSERT INTO heartbeat (id, at) VALUES (1, '');
