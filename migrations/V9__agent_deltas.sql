-- What results, failed dispatches and cancellations give back to an agent, and the outcomes
-- they count, appended as rows instead of updating the agent's row: the next reservation on the
-- agent (which locks its row) or its next heartbeat folds them in. A transaction that gives
-- capacity back never waits for one that reserves it, nor for another that gives some back.
CREATE TABLE agent_deltas (
    id         bigserial PRIMARY KEY,
    agent_id   text    NOT NULL,
    in_flight  integer NOT NULL,
    succeeded  bigint  NOT NULL DEFAULT 0,
    failed     bigint  NOT NULL DEFAULT 0
);
CREATE INDEX agent_deltas_agent ON agent_deltas (agent_id);

-- Agents as they stand: their rows with what is not folded in yet. Every reader reads this.
CREATE VIEW agents_now AS
SELECT a.id, a.capabilities, a.capacity,
       GREATEST(a.in_flight + COALESCE(d.in_flight, 0), 0)::integer AS in_flight,
       a.labels, a.cpu, a.memory_mb, a.gpu, a.last_heartbeat,
       (a.succeeded + COALESCE(d.succeeded, 0))::bigint AS succeeded,
       (a.failed + COALESCE(d.failed, 0))::bigint AS failed,
       a.registered_at, a.heartbeat_every_secs
FROM agents a
LEFT JOIN (SELECT agent_id, sum(in_flight) AS in_flight, sum(succeeded) AS succeeded,
                  sum(failed) AS failed
           FROM agent_deltas GROUP BY agent_id) d ON d.agent_id = a.id;
