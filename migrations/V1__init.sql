-- Switchyard's schema. Every decision is a row; the audit log is append-only.

CREATE TABLE requests (
    id              uuid PRIMARY KEY,
    text            text        NOT NULL,
    submitted_by    text,
    priority        smallint    NOT NULL CHECK (priority BETWEEN 0 AND 9),
    auto_approve    boolean     NOT NULL,
    status          text        NOT NULL,
    failure_reason  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE decompositions (
    request_id  uuid PRIMARY KEY REFERENCES requests (id),
    decomposer  text             NOT NULL,
    intents     jsonb            NOT NULL,
    complexity  double precision NOT NULL CHECK (complexity BETWEEN 0 AND 1),
    created_at  timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id          uuid PRIMARY KEY,
    request_id  uuid             NOT NULL UNIQUE REFERENCES requests (id),
    status      text             NOT NULL,
    complexity  double precision NOT NULL,
    created_at  timestamptz      NOT NULL DEFAULT now(),
    updated_at  timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id                       uuid PRIMARY KEY,
    plan_id                  uuid             NOT NULL REFERENCES plans (id),
    position                 integer          NOT NULL,
    key                      text             NOT NULL,
    work_type                text             NOT NULL,
    description              text             NOT NULL,
    estimated_duration_secs  integer          NOT NULL,
    cpu                      double precision NOT NULL,
    memory_mb                bigint           NOT NULL,
    gpu                      integer          NOT NULL,
    capabilities             text[]           NOT NULL,
    depends_on               uuid[]           NOT NULL,
    affinity                 jsonb            NOT NULL,
    status                   text             NOT NULL,
    attempt                  integer          NOT NULL DEFAULT 0,
    agent_id                 text,
    status_reason            text,
    updated_at               timestamptz      NOT NULL DEFAULT now(),
    UNIQUE (plan_id, key)
);

CREATE TABLE fallback_decisions (
    plan_id                uuid PRIMARY KEY REFERENCES plans (id),
    use_external           boolean          NOT NULL,
    provider               text,
    reason                 text             NOT NULL,
    complexity             double precision NOT NULL,
    estimated_cost_micros  bigint           NOT NULL,
    quota_left_micros      bigint,
    created_at             timestamptz      NOT NULL DEFAULT now()
);

-- One row per plan: approved or rejected, by a person or by the policy.
CREATE TABLE approvals (
    plan_id     uuid PRIMARY KEY REFERENCES plans (id),
    approved    boolean     NOT NULL,
    decided_by  text        NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    id              text PRIMARY KEY,
    capabilities    text[]           NOT NULL,
    capacity        integer          NOT NULL CHECK (capacity > 0),
    in_flight       integer          NOT NULL DEFAULT 0 CHECK (in_flight >= 0),
    labels          jsonb            NOT NULL DEFAULT '{}',
    cpu             double precision NOT NULL DEFAULT 0,
    memory_mb       bigint           NOT NULL DEFAULT 0,
    gpu             integer          NOT NULL DEFAULT 0,
    last_heartbeat  timestamptz      NOT NULL,
    succeeded       bigint           NOT NULL DEFAULT 0,
    failed          bigint           NOT NULL DEFAULT 0,
    registered_at   timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE routing_decisions (
    id                 uuid PRIMARY KEY,
    task_id            uuid             NOT NULL REFERENCES tasks (id),
    plan_id            uuid             NOT NULL REFERENCES plans (id),
    attempt            integer          NOT NULL,
    agent_id           text             NOT NULL,
    score              double precision,
    reason             text             NOT NULL,
    candidates         jsonb            NOT NULL,
    reserved_capacity  boolean          NOT NULL,
    created_at         timestamptz      NOT NULL DEFAULT now(),
    UNIQUE (task_id, attempt)
);

CREATE TABLE dispatches (
    task_id       uuid        NOT NULL REFERENCES tasks (id),
    attempt       integer     NOT NULL,
    decision_id   uuid        NOT NULL REFERENCES routing_decisions (id),
    agent_id      text        NOT NULL,
    queue         text        NOT NULL,
    message_id    uuid        NOT NULL,
    confirmed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);

CREATE TABLE quotas (
    provider         text PRIMARY KEY,
    limit_micros     bigint      NOT NULL CHECK (limit_micros >= 0),
    reserved_micros  bigint      NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    spent_micros     bigint      NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quota_reservations (
    plan_id        uuid PRIMARY KEY REFERENCES plans (id),
    provider       text        NOT NULL REFERENCES quotas (provider),
    amount_micros  bigint      NOT NULL CHECK (amount_micros >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- Set when the reservation is given back (the plan was rejected).
    released_at    timestamptz
);

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    message_id  uuid        NOT NULL,
    stage       text        NOT NULL,
    queue       text        NOT NULL,
    request_id  uuid,
    reason      text        NOT NULL,
    body        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stage, message_id)
);

-- Idempotency: one row per stage and input message. `outputs` holds what the stage published, so
-- that a redelivered input republishes the same messages instead of deciding again.
CREATE TABLE processed_messages (
    stage         text        NOT NULL,
    message_id    uuid        NOT NULL,
    outputs       jsonb       NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stage, message_id)
);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text        NOT NULL,
    event       text        NOT NULL,
    request_id  uuid,
    plan_id     uuid,
    task_id     uuid,
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_request ON audit_log (request_id, id);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

CREATE INDEX tasks_plan ON tasks (plan_id, position);
CREATE INDEX routing_decisions_plan ON routing_decisions (plan_id);
CREATE INDEX dead_letters_request ON dead_letters (request_id);
