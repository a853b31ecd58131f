DROP TABLE operations;
DROP TABLE bindings;
DROP TABLE instances;
