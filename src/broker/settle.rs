//! Settling a consumer's deliveries with as few frames as the broker allows.
//!
//! A stage commits a batch of messages at once, so their acknowledgements come together. One
//! `basic.ack` with `multiple` settles every unsettled delivery of the channel up to its tag, and
//! so may only be sent when every delivery below that tag is settled already or is being acked
//! with it: a delivery still in hand (retrying, waiting for its turn) must not be acked behind
//! its handler's back, nor one already nacked be acked again (an unknown delivery tag closes the
//! channel).
//!
//! Each subscription has one settler task that sends all the channel's acks and nacks, in the
//! order it plans them. What it plans is [`Ledger::plan`], pure: the broker numbers a channel's
//! deliveries 1, 2, 3, … (one consumer per channel here), so the settler knows which tags are
//! settled without being told of each delivery.

use std::collections::BTreeSet;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{mpsc, oneshot};

use super::Error;

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum How {
    Ack,
    /// Back to its queue, to be delivered again.
    Requeue,
    /// Refused: dead-lettered by the queue's exchange, or dropped.
    Reject,
    /// Acked with every earlier delivery of the channel (the caller vouches that they are all
    /// settled or to be settled by this).
    AckUpTo,
}

/// One frame to send: settle `tag` as `how`, and with `multiple`, every unsettled tag below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Frame {
    pub tag: u64,
    pub how: How,
    pub multiple: bool,
}

/// What the settler knows of its channel's delivery tags.
#[derive(Debug)]
pub(super) struct Ledger {
    /// Every tag below this one is settled.
    settled_below: u64,
    /// Tags at or above `settled_below` settled out of order.
    settled_above: BTreeSet<u64>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger { settled_below: 1, settled_above: BTreeSet::new() }
    }
}

impl Ledger {
    /// The frames that settle `requests` (tags and how, each tag once), in the order to send
    /// them, and the tags each frame settles. Acks that extend the settled run of tags from its
    /// start go as one multiple ack; the rest go one frame per delivery.
    pub(super) fn plan(&mut self, requests: &[(u64, How)]) -> Vec<(Frame, Vec<u64>)> {
        let mut frames: Vec<(Frame, Vec<u64>)> = Vec::new();
        let mut acks = BTreeSet::new();
        let mut up_to = None;
        for &(tag, how) in requests {
            match how {
                How::Ack => {
                    acks.insert(tag);
                }
                How::AckUpTo => {
                    frames.push((Frame { tag, how: How::Ack, multiple: true }, vec![tag]));
                    up_to = Some(frames.len() - 1);
                    self.settled_below = self.settled_below.max(tag + 1);
                    self.settled_above = self.settled_above.split_off(&self.settled_below);
                }
                How::Requeue | How::Reject => {
                    frames.push((Frame { tag, how, multiple: false }, vec![tag]));
                    self.settled_above.insert(tag);
                }
            }
        }
        // Acks that an ack up to a later tag settled are answered by its frame.
        let passed = acks.iter().copied().filter(|tag| *tag < self.settled_below);
        if let Some(index) = up_to {
            frames[index].1.extend(passed);
        }
        acks.retain(|tag| *tag >= self.settled_below);
        // The run: tags from `settled_below` on that are settled or acked now.
        let mut run = Vec::new();
        let mut next = self.settled_below;
        loop {
            if acks.remove(&next) {
                run.push(next);
            } else if !self.settled_above.remove(&next) {
                break;
            }
            next += 1;
        }
        self.settled_below = next;
        if let Some(&last) = run.last() {
            frames.push((Frame { tag: last, how: How::Ack, multiple: run.len() > 1 }, run));
        }
        for tag in acks {
            frames.push((Frame { tag, how: How::Ack, multiple: false }, vec![tag]));
            self.settled_above.insert(tag);
        }
        frames
    }
}

/// A request to the settler: a delivery, how to settle it, and who waits for the answer.
pub(super) struct Request {
    tag: u64,
    how: How,
    acker: Acker,
    done: oneshot::Sender<Result<(), lapin::Error>>,
}

/// The handle on a subscription's settler task; the task ends once every handle is dropped.
#[derive(Debug, Clone)]
pub(super) struct Settler {
    requests: mpsc::UnboundedSender<Request>,
}

impl Settler {
    /// Starts the settler of a new channel's deliveries.
    pub(super) fn start() -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(settle(receiver));
        Settler { requests }
    }

    /// Settles delivery `tag` as `how`, once the frame that does so is sent.
    pub(super) async fn settle(&self, tag: u64, how: How, acker: &Acker) -> Result<(), Error> {
        let (done, answer) = oneshot::channel();
        let request = Request { tag, how, acker: acker.clone(), done };
        self.requests.send(request).map_err(|_| Error::NotSettled)?;
        match answer.await {
            Ok(sent) => sent.map_err(Error::from),
            Err(_) => Err(Error::NotSettled),
        }
    }
}

/// The settler task: takes whatever requests have come, plans them, and sends the frames one
/// after another, so that the broker sees them in the planned order. Requests that come while
/// frames are being sent are planned together next time round: the busier the consumer, the
/// more a frame settles.
async fn settle(mut receiver: mpsc::UnboundedReceiver<Request>) {
    let mut ledger = Ledger::default();
    let mut requests = Vec::new();
    while receiver.recv_many(&mut requests, 1024).await > 0 {
        let asked: Vec<(u64, How)> = requests.iter().map(|r| (r.tag, r.how)).collect();
        let mut waiting: std::collections::HashMap<u64, Request> =
            requests.drain(..).map(|r| (r.tag, r)).collect();
        for (frame, settles) in ledger.plan(&asked) {
            let Some(sender) = waiting.get(&frame.tag) else { continue };
            let sent = send(&sender.acker, frame.how, frame.multiple).await;
            for tag in settles {
                if let Some(request) = waiting.remove(&tag) {
                    let _ = request.done.send(sent.clone());
                }
            }
        }
    }
}

/// Sends the one frame that settles the delivery of `acker` as `how` (with `multiple`, every
/// unsettled delivery of its channel below it too).
pub(super) async fn send(acker: &Acker, how: How, multiple: bool) -> Result<(), lapin::Error> {
    match how {
        How::Ack | How::AckUpTo => acker.ack(BasicAckOptions { multiple }).await?,
        How::Requeue => acker.nack(BasicNackOptions { requeue: true, multiple }).await?,
        How::Reject => acker.nack(BasicNackOptions { requeue: false, multiple }).await?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(ledger: &mut Ledger, requests: &[(u64, How)]) -> Vec<Frame> {
        ledger.plan(requests).into_iter().map(|(frame, _)| frame).collect()
    }

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame { tag, how: How::Ack, multiple }
    }

    #[test]
    fn acks_of_a_run_from_the_first_unsettled_tag_go_as_one_frame() {
        let mut ledger = Ledger::default();
        let requests: Vec<_> = [3, 1, 2, 4].into_iter().map(|tag| (tag, How::Ack)).collect();
        assert_eq!(plan(&mut ledger, &requests), vec![ack(4, true)]);
        assert_eq!(plan(&mut ledger, &[(5, How::Ack)]), vec![ack(5, false)]);
    }

    #[test]
    fn a_delivery_still_in_hand_is_never_acked_by_a_multiple_ack() {
        let mut ledger = Ledger::default();
        // 3 is in hand: 1 and 2 go together, 4 and 5 alone.
        let frames = plan(&mut ledger, &[(1, How::Ack), (2, How::Ack), (4, How::Ack), (5, How::Ack)]);
        assert_eq!(frames, vec![ack(2, true), ack(4, false), ack(5, false)]);
        // Once 3 is acked, it goes alone: 4 and 5 are settled already, and 6 joins it.
        assert_eq!(plan(&mut ledger, &[(3, How::Ack), (6, How::Ack)]), vec![ack(6, true)]);
        assert_eq!(plan(&mut ledger, &[(7, How::Ack)]), vec![ack(7, false)]);
    }

    #[test]
    fn nacks_go_alone_and_before_a_multiple_ack_that_passes_them() {
        let mut ledger = Ledger::default();
        let frames = plan(&mut ledger, &[(1, How::Ack), (2, How::Requeue), (3, How::Ack), (4, How::Reject)]);
        assert_eq!(
            frames,
            vec![
                Frame { tag: 2, how: How::Requeue, multiple: false },
                Frame { tag: 4, how: How::Reject, multiple: false },
                ack(3, true),
            ]
        );
        assert_eq!(plan(&mut ledger, &[(5, How::Ack)]), vec![ack(5, false)]);
    }

    #[test]
    fn an_ack_up_to_a_tag_settles_everything_below_it() {
        let mut ledger = Ledger::default();
        assert_eq!(plan(&mut ledger, &[(3, How::Ack)]), vec![ack(3, false)]);
        assert_eq!(plan(&mut ledger, &[(10, How::AckUpTo)]), vec![ack(10, true)]);
        assert_eq!(plan(&mut ledger, &[(11, How::Ack), (12, How::Ack)]), vec![ack(12, true)]);
        let planned = ledger.plan(&[(13, How::Ack), (15, How::AckUpTo)]);
        assert_eq!(planned, vec![(ack(15, true), vec![15, 13])]);
    }

    #[test]
    fn each_frame_names_the_tags_it_settles() {
        let mut ledger = Ledger::default();
        let planned = ledger.plan(&[(2, How::Ack), (1, How::Ack), (4, How::Ack)]);
        let settles: Vec<Vec<u64>> = planned.into_iter().map(|(_, tags)| tags).collect();
        assert_eq!(settles, vec![vec![1, 2], vec![4]]);
    }
}
