//! Prints the in-memory sizes of the machine's types: `cargo run -p leasehold-core --example sizes`.
use core::mem::size_of;
use leasehold_core::session::wire::{SessionRequest, SessionResponse};
use leasehold_core::session::{Session, SessionEvent};
use leasehold_core::{authority::Record, Config, Event, Lease, Request, Response};

fn main() {
    println!("Lease    {:>4} bytes", size_of::<Lease>());
    println!("  Config {:>4} bytes", size_of::<Config>());
    println!("  Event  {:>4} bytes (the lease queues up to 2)", size_of::<Event>());
    println!("Request  {:>4} bytes", size_of::<Request>());
    println!("Response {:>4} bytes", size_of::<Response>());
    println!("Record   {:>4} bytes", size_of::<Record>());
    println!("Session<2>     {:>5} bytes (2 keys, 16 observed keys: the default)", size_of::<Session<2>>());
    println!("Session<2, 0>  {:>5} bytes (2 keys, no observed keys)", size_of::<Session<2, 0>>());
    println!("SessionEvent   {:>5} bytes", size_of::<SessionEvent>());
    println!("SessionRequest {:>5} bytes", size_of::<SessionRequest>());
    println!("SessionResponse {:>4} bytes", size_of::<SessionResponse>());
}
