mod harness;
mod machine;
mod outcomes;
