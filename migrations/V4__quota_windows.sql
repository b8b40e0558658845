-- Quota as a resource with windows: a provider's budget starts afresh every day or month (UTC),
-- each window keeping its own figures; reservations are settled against what was really used.
--
-- `window` is a reserved word in SQL, hence `window_kind` ('daily' or 'monthly').

-- The configured budget last seen at worker start, apart from the limit in force: `switchyard
-- quota set` changes the limit, and a worker restarted with the same configuration leaves it so;
-- a changed configuration wins.
ALTER TABLE quotas ADD COLUMN configured_micros bigint CHECK (configured_micros >= 0);
UPDATE quotas SET configured_micros = limit_micros;
ALTER TABLE quotas ALTER COLUMN configured_micros SET NOT NULL;
ALTER TABLE quotas ADD COLUMN window_kind text NOT NULL DEFAULT 'monthly'
    CHECK (window_kind IN ('daily', 'monthly'));
ALTER TABLE quotas ALTER COLUMN window_kind DROP DEFAULT;

-- Before V4 a reservation went back only on rejection: those of plans that ended otherwise
-- (completed, failed, or whose request failed) still held quota. Nothing recorded what they
-- really used, so they are released whole, and kept as history.
WITH ended AS (
    UPDATE quota_reservations r SET released_at = now()
    FROM plans p JOIN requests q ON q.id = p.request_id
    WHERE r.plan_id = p.id AND r.released_at IS NULL
      AND (p.status IN ('completed', 'failed', 'rejected') OR q.status IN ('completed', 'failed', 'rejected'))
    RETURNING r.provider, r.amount_micros
)
UPDATE quotas q SET reserved_micros = greatest(q.reserved_micros - s.total, 0)
FROM (SELECT provider, sum(amount_micros) AS total FROM ended GROUP BY provider) s
WHERE q.provider = s.provider;

-- What is reserved and spent in each window of a provider, a row created by the first reservation
-- or use in it. Remaining = the provider's limit - reserved - spent. A new window has no row, so
-- it starts whole: that is the rollover, with no job to run. The window kind is part of the key:
-- a provider whose configuration changes from monthly to daily starts a fresh daily account
-- instead of sharing the monthly one's row (both start at midnight on the first of the month).
CREATE TABLE quota_windows (
    provider         text        NOT NULL REFERENCES quotas (provider),
    window_kind      text        NOT NULL CHECK (window_kind IN ('daily', 'monthly')),
    window_start     timestamptz NOT NULL,
    reserved_micros  bigint      NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    spent_micros     bigint      NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, window_kind, window_start)
);

-- What was reserved and spent so far moves into the current monthly window (the only kind there
-- was), so that nothing reserved is forgotten and nothing spent is offered again this month.
INSERT INTO quota_windows (provider, window_kind, window_start, reserved_micros, spent_micros)
SELECT provider, 'monthly', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       reserved_micros, spent_micros
FROM quotas WHERE reserved_micros > 0 OR spent_micros > 0;
ALTER TABLE quotas DROP COLUMN reserved_micros;
ALTER TABLE quotas DROP COLUMN spent_micros;

-- A reservation lives in the window it was made in; it is settled once, when its plan finishes
-- (completed or failed) or is rejected: `settled_at` says when, `released_micros` how much of it
-- went back to the window (the amount less what was spent, never below 0). Before V4,
-- `released_at` was set only on rejection; it is the same moment, renamed.
ALTER TABLE quota_reservations RENAME COLUMN released_at TO settled_at;
ALTER TABLE quota_reservations ADD COLUMN window_kind text CHECK (window_kind IN ('daily', 'monthly'));
ALTER TABLE quota_reservations ADD COLUMN window_start timestamptz;
-- Real use reported so far against the reservation, whatever the amount reserved.
ALTER TABLE quota_reservations ADD COLUMN spent_micros bigint NOT NULL DEFAULT 0 CHECK (spent_micros >= 0);
ALTER TABLE quota_reservations ADD COLUMN input_tokens bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0);
ALTER TABLE quota_reservations ADD COLUMN output_tokens bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0);
ALTER TABLE quota_reservations ADD COLUMN released_micros bigint CHECK (released_micros >= 0);
-- Open reservations are in the current monthly window now (see above); settled ones are history,
-- dated by the month they were made in. A rejection released the whole amount.
UPDATE quota_reservations SET window_kind = 'monthly',
    window_start = CASE WHEN settled_at IS NULL
        THEN date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        ELSE date_trunc('month', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' END,
    released_micros = CASE WHEN settled_at IS NULL THEN NULL ELSE amount_micros END;
ALTER TABLE quota_reservations ALTER COLUMN window_kind SET NOT NULL;
ALTER TABLE quota_reservations ALTER COLUMN window_start SET NOT NULL;
ALTER TABLE quota_reservations ADD CHECK ((settled_at IS NULL) = (released_micros IS NULL));

-- Each attempt's real use, once: a redelivered result finds its row and counts nothing again.
-- `window_kind`/`window_start` are the window it was counted in (NULL: the provider has no quota
-- row); `from_reserved_micros` is the part of the cost taken off the plan's reservation.
CREATE TABLE quota_usage (
    task_id               uuid        NOT NULL REFERENCES tasks (id),
    attempt               integer     NOT NULL,
    plan_id               uuid        NOT NULL REFERENCES plans (id),
    provider              text        NOT NULL,
    input_tokens          bigint      NOT NULL CHECK (input_tokens >= 0),
    output_tokens         bigint      NOT NULL CHECK (output_tokens >= 0),
    cost_micros           bigint      NOT NULL CHECK (cost_micros >= 0),
    window_kind           text        CHECK (window_kind IN ('daily', 'monthly')),
    window_start          timestamptz,
    from_reserved_micros  bigint      NOT NULL CHECK (from_reserved_micros >= 0),
    recorded_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX quota_usage_plan ON quota_usage (plan_id);
