//! TEMPORARY stand-in for `crate::data` while the dataset module is being written (issue 4); same names and
//! signatures as its spec. Removed once `data` lands.
#![allow(missing_docs, dead_code)]

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    Classes { classes: usize },
    Plate { slots: usize, classes: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropStyle {
    Loose,
    Tight,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<f32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub labels: Vec<u32>,
    pub task: Task,
    pub styles: Option<Vec<CropStyle>>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len() / self.slots()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn slots(&self) -> usize {
        match self.task {
            Task::Classes { .. } => 1,
            Task::Plate { slots, .. } => slots,
        }
    }
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.channels * self.height * self.width;
        &self.images[i * n..(i + 1) * n]
    }
    pub fn label(&self, i: usize) -> &[u32] {
        let s = self.slots();
        &self.labels[i * s..(i + 1) * s]
    }
}
