"""`tagstream explain`: one customer's timeline and why each type was reported or not
(SPEC §9). `timeline` is the pure part over the replay engine; `run` reads the customer's
partition and the delivered record."""
