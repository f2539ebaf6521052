//! Deterministic simulation of leasehold clients, an authority and a faulty network.
