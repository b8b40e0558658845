-- Agents close the loop: each attempt's result, and a lease on every dispatched task.

CREATE TABLE task_results (
    task_id      uuid        NOT NULL REFERENCES tasks (id),
    attempt      integer     NOT NULL,
    agent_id     text        NOT NULL,
    success      boolean     NOT NULL,
    output       text        NOT NULL,
    error        text,
    -- 'agent' for a reported result, 'lease' for a lease that expired without one.
    source       text        NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);

-- Bumped by every recorded result: the track stage decides on a plan as it saw it, and a result
-- recorded meanwhile makes it decide again (two last results at once must complete the plan).
ALTER TABLE plans ADD COLUMN version bigint NOT NULL DEFAULT 0;

ALTER TABLE tasks ADD COLUMN lease_expires_at timestamptz;
ALTER TABLE tasks ADD COLUMN finished_at timestamptz;

-- The lease sweeper looks only at dispatched tasks.
CREATE INDEX tasks_lease ON tasks (lease_expires_at) WHERE status = 'dispatched';
