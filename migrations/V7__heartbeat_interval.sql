-- How often an agent said it heartbeats: a heartbeat older than that (and a margin) says the
-- agent went silent, well before the routing TTL declares it gone. NULL when it did not say
-- (agents registered by hand, agents of older versions).
ALTER TABLE agents ADD COLUMN heartbeat_every_secs integer CHECK (heartbeat_every_secs > 0);
