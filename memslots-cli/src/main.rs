//! The `memslots` command-line tool.

fn main() {
    println!("memslots: subcommands arrive with their issues");
}
